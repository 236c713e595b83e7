"""``python -m onnx_lsuv``: the same command as ``onnx-lsuv``."""

from onnx_lsuv_cli.main import main

if __name__ == "__main__":
    main()
