"""Experiments: configs (`get_config()`), the train loop and reproduction scripts.

    python -m experiments.main                        # the README's main job
    python -m experiments.main --config experiments/configs/flipout_vgg19_cifar10.py \
        --config.target=99.61
    python -m experiments.reproduce_flipout --workers 2
"""
