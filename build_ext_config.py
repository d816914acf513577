"""Native extensions of sinq-vllm, kept out of setup.py so it stays readable.

The CPU kernel extension (issue: CPU kernel) and the CUDA extension are added here;
with none available the package installs pure-Python and selects the torch backend.
"""


def get_ext_modules():
    return []


def get_cmdclass():
    return {}
