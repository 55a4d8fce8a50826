"""Flower adapters: the strategies (ResIST, depth prefix, DepthFL, FedAvg and fedavg-small, HeteroFL,
FedRolex, FjORD), node sampling, reply screening, central DP, metering, the round recorder."""
