"""Offline planner (device and model profiles, cost model, deploy writer). Arrives with the planner issue;
the runtime (engine/, kernels/) never imports it."""
