"""The compiler driver: compile(), update schemes, optimizers, costs and the compile report, `pockprop compile`."""
