package pki

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Placeholders of a SPIFFE ID template.
const (
	iidPlaceholder  = "{iid}"
	rolePlaceholder = "{role}"
)

// SPIFFEMapping maps instance identities to and from SPIFFE IDs of one
// trust domain by a path template such as "/ns/{role}/sa/{iid}": the
// template's literal segments must match exactly, {iid} (required) takes
// one whole path segment as the instance id and {role} (optional) one as
// the role. Without {role} an ID attests only the instance, and the role
// is left to the membership (see Match).
//
// IDs that SPIRE or cert-manager's csi-driver-spiffe issue, such as
// spiffe://example.org/ns/prod/sa/cache-0, are mapped with no change to
// them; the characters an id or role can take are then those of a SPIFFE
// path segment (letters, digits, '.', '-' and '_').
type SPIFFEMapping struct {
	td       spiffeid.TrustDomain
	template string
	segments []string // literal segments and placeholders
}

// NewSPIFFEMapping validates trustDomain (e.g. "example.org") and
// template, and returns their mapping.
func NewSPIFFEMapping(trustDomain, template string) (*SPIFFEMapping, error) {
	td, err := ParseTrustDomain(trustDomain)
	if err != nil {
		return nil, err
	}
	segments, err := parseTemplate(template)
	if err != nil {
		return nil, fmt.Errorf("ID template %q: %w", template, err)
	}
	return &SPIFFEMapping{td: td, template: template, segments: segments}, nil
}

// ParseTrustDomain validates a trust domain name such as example.org.
func ParseTrustDomain(name string) (spiffeid.TrustDomain, error) {
	if strings.Contains(name, "/") {
		return spiffeid.TrustDomain{}, fmt.Errorf("trust domain %q: give the name only (e.g. example.org), not a SPIFFE ID", name)
	}
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("trust domain %q: %w", name, err)
	}
	return td, nil
}

func parseTemplate(template string) ([]string, error) {
	if !strings.HasPrefix(template, "/") {
		return nil, errors.New("must start with /")
	}
	segments := strings.Split(template[1:], "/")
	seen := map[string]bool{}
	for _, s := range segments {
		switch {
		case s == iidPlaceholder || s == rolePlaceholder:
			if seen[s] {
				return nil, fmt.Errorf("%s appears more than once", s)
			}
			seen[s] = true
		case strings.ContainsAny(s, "{}"):
			return nil, fmt.Errorf("segment %q: a placeholder ({iid} or {role}) must be a whole path segment", s)
		default:
			if err := spiffeid.ValidatePathSegment(s); err != nil {
				return nil, fmt.Errorf("segment %q: %w", s, err)
			}
		}
	}
	if !seen[iidPlaceholder] {
		return nil, errors.New("has no {iid} segment")
	}
	return segments, nil
}

// TrustDomain is the trust domain whose IDs the mapping accepts.
func (m *SPIFFEMapping) TrustDomain() spiffeid.TrustDomain { return m.td }

// Template is the path template, as given.
func (m *SPIFFEMapping) Template() string { return m.template }

// HasRole says whether the template has a {role} segment, so that IDs
// attest roles.
func (m *SPIFFEMapping) HasRole() bool {
	for _, s := range m.segments {
		if s == rolePlaceholder {
			return true
		}
	}
	return false
}

// ID returns the SPIFFE ID of instance id.
func (m *SPIFFEMapping) ID(id Identity) (spiffeid.ID, error) {
	out := make([]string, len(m.segments))
	for i, s := range m.segments {
		out[i] = s
		what := ""
		switch s {
		case iidPlaceholder:
			out[i], what = id.IID, "iid"
		case rolePlaceholder:
			out[i], what = id.Role, "role"
		default:
			continue
		}
		if err := spiffeid.ValidatePathSegment(out[i]); err != nil {
			return spiffeid.ID{}, fmt.Errorf("%s %q cannot be a SPIFFE ID path segment: %w", what, out[i], err)
		}
	}
	return spiffeid.FromSegments(m.td, out...)
}

// Identity returns the instance that SPIFFE ID id names.
func (m *SPIFFEMapping) Identity(id spiffeid.ID) (Identity, error) {
	if !id.MemberOf(m.td) {
		return Identity{}, fmt.Errorf("SPIFFE ID %s is not in trust domain %s", id, m.td.Name())
	}
	got := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	mismatch := func() error {
		return fmt.Errorf("SPIFFE ID %s does not match the ID template %s", id, m.template)
	}
	if len(got) != len(m.segments) {
		return Identity{}, mismatch()
	}
	var out Identity
	for i, s := range m.segments {
		switch s {
		case iidPlaceholder:
			out.IID = got[i]
		case rolePlaceholder:
			out.Role = got[i]
		default:
			if got[i] != s {
				return Identity{}, mismatch()
			}
		}
	}
	return out, nil
}
