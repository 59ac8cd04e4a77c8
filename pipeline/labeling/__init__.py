"""Labeling: box edits, the review queue, history and undo (``edits``), and the Label tab's operations on what the labeler sees (``review``)."""
