"""Experiments: configs (`get_config()`), the train loop, sweeps and figures.

    python -m experiments.main                        # the README's main job
    python -m experiments.main --config experiments/configs/flipout_vgg19_cifar10.py \
        --config.target=99.61
    python -m experiments.sweep --config experiments/configs/dst_lenet300100_mnist5k.py \
        --grid method=dst_ee,rigl --grid sparsity=0.9,0.95 --seeds 42,43,44
"""
