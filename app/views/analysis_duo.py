"""The duo analyzer page."""

from app.analyzer_page import show

show("duo")
