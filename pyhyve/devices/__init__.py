"""Legacy platform devices: the ISA/LPC world firmware expects."""
