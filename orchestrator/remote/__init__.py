"""Everything that talks to the VMs over SSH (Fabric / paramiko). Imported lazily by lifecycle."""
