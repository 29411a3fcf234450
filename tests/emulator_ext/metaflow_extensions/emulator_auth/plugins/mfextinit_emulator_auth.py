# Test-only Metaflow extension: client providers that authenticate to the loopback emulators,
# selected through Metaflow's own settings (METAFLOW_DEFAULT_AZURE_CLIENT_PROVIDER,
# METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER), exactly where a user plugs in their own credentials.
AZURE_CLIENT_PROVIDERS_DESC = [("azurite-token", ".emulator_auth.AzuriteTokenProvider")]
GCP_CLIENT_PROVIDERS_DESC = [("gcs-emulator", ".emulator_auth.GcsEmulatorProvider")]
