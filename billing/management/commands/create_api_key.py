from django.core.management.base import BaseCommand, CommandError

from billing.services.api_keys import ALL_SCOPES, api_key_create


class Command(BaseCommand):
    help = "Create an API key. The key is printed once, as the last line; only its hash is stored."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--scope", action="append", choices=ALL_SCOPES, dest="scopes",
                            help="Repeat for several scopes. Without it the key has every scope.")

    def handle(self, *args, name, scopes, **options):
        try:
            api_key, key = api_key_create(name=name, scopes=scopes)
        except ValueError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"Created API key {api_key.name!r} with scopes: {', '.join(api_key.scopes)}")
        self.stdout.write("Store it now; it cannot be shown again:")
        self.stdout.write(key)
