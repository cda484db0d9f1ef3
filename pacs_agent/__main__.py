from pacs_agent.cli.main import app

app(prog_name="pacs-agent")
