"""Training configs, one file per run, for `--config=configs/<name>.py`.

Installed as `topk_sparse.configs`, so that code outside a checkout (a
notebook, a user's script) takes them with
`from topk_sparse.configs import vit_cifar10` and `vit_cifar10.get_config()`.
"""
