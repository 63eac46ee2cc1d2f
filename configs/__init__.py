"""actedit.configs."""
