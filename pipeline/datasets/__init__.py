"""Datasets: export (YOLO, COCO, VOC), import with hostile-archive checks, and one-time export downloads."""
