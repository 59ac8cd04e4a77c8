"""Training our own models: the ResNet50 face embedder and the YOLO face detector.

Modules (each one job):
- ``augment``: face-chip augmentation (torchvision v2) and preview grids for the UI.
- ``losses``: ArcFace / CosFace margin heads and teacher-similarity distillation.
- ``splits``: the seeded three-way split (train / select / test) of images or people.
- ``chip_data``: aligned-chip sets (build on CPU, store as a compact .npz).
- ``embedder_trainer``: ``train_embedder`` (distillation, then margin fine-tuning).
- ``yolo_dataset``: export (image, boxes) lists as a YOLO dataset; face_mask VOC -> YOLO.
- ``detector_trainer``: ``train_detector`` through ultralytics, offline.
- (the one-command GPU runs live in ``tools/gpu_train.sh``, outside the product packages)

Nothing here imports ``storage`` or ``pipeline``; heavy libraries load lazily.
"""
