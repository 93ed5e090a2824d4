"""The lean online half: preprocessing, prompting, sessions, generation; no torch."""
