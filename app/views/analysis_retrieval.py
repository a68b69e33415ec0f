"""The retrieval analyzer page."""

from app.analyzer_page import show

show("retrieval")
