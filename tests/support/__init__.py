"""What the tests and the benchmark share: real processes and servers (`services`), waiting
for a condition (`waiting`) and throwaway databases (`databases`)."""
