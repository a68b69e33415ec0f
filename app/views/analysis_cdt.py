"""The cdt analyzer page."""

from app.analyzer_page import show

show("cdt")
