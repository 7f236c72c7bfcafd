"""Small helpers shared by every level: atomic writes, plots, Markdown tables."""
