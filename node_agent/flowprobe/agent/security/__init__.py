"""Security context on captured traffic: WAF detection (ModSecurity + CRS) and sensitive data."""
