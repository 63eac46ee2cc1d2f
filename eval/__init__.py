"""actedit.eval."""
