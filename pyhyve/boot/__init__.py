"""Ways a guest starts: a bootrom at the reset vector, or a loaded kernel."""
