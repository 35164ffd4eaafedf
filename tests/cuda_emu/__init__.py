"""CUDA-on-CPU emulation harness: emu.h, its build helper (build.py) and its self-tests."""
