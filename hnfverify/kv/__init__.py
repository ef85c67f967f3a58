"""The runtime side (torch): quantizers that store exactly what a plan says, in packed bytes."""
