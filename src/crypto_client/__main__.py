from crypto_client.cli import app

app(prog_name="crypto-client")
