"""The polymorphic neuron engine: the executors that run each phase and layer, chosen once at load."""
