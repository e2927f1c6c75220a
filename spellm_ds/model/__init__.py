"""Models: the student with char heads, the original tail, the online teacher, teacher import."""
