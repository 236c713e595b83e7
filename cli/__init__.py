"""The click front end of onnx-lsuv (installed as the package ``onnx_lsuv_cli``)."""
