"""The local target's VMs: each emulated VM is a host process on its own loopback addresses, with
its own Python environment, that lives exactly as long as the VM (see host.py)."""
