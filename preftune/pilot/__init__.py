"""The pilot: a cheap go / no-go experiment before a team commits to PPO (``preftune pilot``)."""
