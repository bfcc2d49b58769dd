"""The neuron store on flash: the bundle file, its reader threads, the segmented neuron cache and whole matrices streamed from the weights file."""
