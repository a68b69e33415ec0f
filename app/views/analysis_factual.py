"""The factual analyzer page."""

from app.analyzer_page import show

show("factual")
