"""Model evaluation: detection metrics (VOC-style AP, recall by size) and face
verification metrics (LFW pairs, k-fold accuracy, ROC/AUC, TAR at a fixed FAR)."""
