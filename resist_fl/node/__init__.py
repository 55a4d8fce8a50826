"""What runs on a node (a ClientApp's side): local training and evaluation loops
(:mod:`~resist_fl.node.training`) and the step loop's peak memory (:mod:`~resist_fl.node.peak_memory`)."""
