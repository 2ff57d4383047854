import os

# Tests run on CPU; Pallas kernels run there with interpret=True.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
