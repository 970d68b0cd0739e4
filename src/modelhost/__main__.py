from modelhost.cli import app

app(prog_name="modelhost")
