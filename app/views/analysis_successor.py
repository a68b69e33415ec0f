"""The successor analyzer page."""

from app.analyzer_page import show

show("successor")
