"""Exports: an edit as a checkpoint other engines load (:mod:`actedit.export.hf`)."""
