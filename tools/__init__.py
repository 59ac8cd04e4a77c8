"""Developer tooling outside the product packages: the one-command GPU training runs
(``gpu_train.sh`` on a lent GPU machine, ``gpu_train.py`` for their CPU-side payload and
joining the results back)."""
