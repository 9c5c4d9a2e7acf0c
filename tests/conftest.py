"""Test settings shared by every test: nnU-Net must not compile or spawn workers on a 2-core CI machine."""

import os

os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_n_proc_DA", "0")
