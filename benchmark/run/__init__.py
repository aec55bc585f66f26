"""Training side: the loop, launchers, DDP and the speed benchmark."""
