"""Planning: memory, communication and FLOPs per GPU before a job is submitted."""
