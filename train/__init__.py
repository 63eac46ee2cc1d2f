"""actedit.train."""
