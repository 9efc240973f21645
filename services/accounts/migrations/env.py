from libs.alembic.env import run

run()
