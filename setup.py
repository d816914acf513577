"""Build and install sinq-vllm.

The package has no hard dependency on a particular vLLM build: CPU users install the
pinned CPU stack from ``requirements/cpu.txt`` (what ``make`` does), GPU users install
against their CUDA vLLM. Native kernels are optional extensions built when a compiler
(and, for CUDA, a CUDA build of torch) is present; the Python code reports clearly
when a backend it was asked for is missing.
"""

from setuptools import find_packages, setup

from build_ext_config import get_ext_modules, get_cmdclass

setup(
    name="sinq-vllm",
    version="0.1.0",
    description="vLLM plugin for SINQ (Sinkhorn-Normalized Quantization) checkpoints",
    python_requires=">=3.10",
    packages=find_packages(include=["sinq_vllm", "sinq_vllm.*"])
    + ["sinq_vllm.triton_kernels"],
    package_dir={"sinq_vllm.triton_kernels": "triton_kernels"},
    install_requires=[
        "torch",
        "safetensors",
        "transformers",
        "tqdm",
        "numpy",
    ],
    extras_require={"vllm": ["vllm>=0.32,<0.33"]},
    entry_points={
        "vllm.general_plugins": ["sinq = sinq_vllm:register"],
        "console_scripts": ["sinq-vllm = sinq_vllm.cli:main"],
    },
    ext_modules=get_ext_modules(),
    cmdclass=get_cmdclass(),
)
