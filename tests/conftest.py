"""Every test process sees 8 CPU devices, so multi-device code runs on this machine.
Single-device tests build a 1-device mesh explicitly."""
import os

# LLVM at -O0 for XLA's CPU code: compiling, not running, is most of a test's time with these tiny
# models, and it takes about half as long; the results agree within every test's tolerance.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
