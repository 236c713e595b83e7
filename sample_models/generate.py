"""Generate the sample models and the digits batch.

    python sample_models/generate.py                 # the committed files, regenerated
    python sample_models/generate.py --arch fitnet4 --activation tanh -o /tmp/fitnet4_tanh.onnx

Needs scikit-learn for the digits batch (pip install scikit-learn, or pip install '.[sample]' from a checkout).
"""

from __future__ import annotations

import os
import sys

import click
import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fitnets import ACTIVATIONS, ARCHITECTURES, build, digits_batch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@click.command()
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default=None,
              help="Build one architecture (default: regenerate the committed samples).")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default="relu", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--seed", type=int, default=0, show_default=True)
def main(arch, activation, output, seed):
    if arch is not None:
        out = output or f"{arch}_{activation}.onnx"
        onnx.save(build(arch, activation, seed=seed), out)
        click.echo(f"wrote {out}")
        return
    model_path = os.path.join(HERE, "fitnet_mnist_relu.onnx")
    onnx.save(build("fitnet_mnist", "relu", seed=seed), model_path)
    data_path = os.path.join(HERE, "digits_batch.npy")
    np.save(data_path, digits_batch(n=128, size=28, seed=seed))
    click.echo(f"wrote {model_path} and {data_path}")


if __name__ == "__main__":
    main()
