"""Pure decisions: where instances go (placement), when to scale (policy), and the pool they form."""
