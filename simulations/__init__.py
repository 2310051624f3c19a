"""The simulation side: a cohort sharded into virtual sites, federated on one machine (or a Ray
cluster) with the same ServerApp and ClientApp a deployment runs.

`cli` (``safn-sim``), `engine` (Flower's Simulation Engine on Ray), `partition` (sharding
schemes), `virtual_sites` (the virtual sites' disks), `compare` (pooled / federated /
local-only on the same splits), `loso` (leave-one-site-out), `report` (the HTML report).
"""
