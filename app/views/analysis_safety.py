"""The safety analyzer page."""

from app.analyzer_page import show

show("safety")
