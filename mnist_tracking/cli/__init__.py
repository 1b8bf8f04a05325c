"""The command line on top: click commands built from the one parameter definition, and how a command ends (exits)."""
